"""Alignment: pure losses, advantage estimators and the trainers built on them."""
