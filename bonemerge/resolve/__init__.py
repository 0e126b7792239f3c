"""Turning what the user named (paths, Hub ids) into opened inputs."""
