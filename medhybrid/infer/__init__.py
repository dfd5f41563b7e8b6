"""Inference over studies: predictor, saliency, native-geometry outputs, reports and the batch runner."""
