"""Face-age datasets: TFDS builders, preparation and the host input pipeline."""
