"""An exactly evaluable testbed for CTRL: small policies whose whole response distribution can be
enumerated, so the trainer's result is compared with the exact KL-regularised optimum and with the
closed form, with no sampling noise in the evaluation (see ``iapo testbed``)."""
