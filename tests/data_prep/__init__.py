"""Tests of the data_prep stage."""
