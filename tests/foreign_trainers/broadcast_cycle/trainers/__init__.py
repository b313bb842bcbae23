"""Trainers of the broadcast_cycle example package."""
