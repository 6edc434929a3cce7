"""Trainers: the base loop and one trainer per method."""
