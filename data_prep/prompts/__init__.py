"""Packaged prompt sets (data files only); see README.md in this folder."""
