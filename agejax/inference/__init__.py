"""Inference: Predictor, photos (detection and crops), export."""
