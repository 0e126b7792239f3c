"""What a run leaves behind: the staging folder that becomes the output, its manifest,
companion files, model card and history, and the upload to the Hub."""
