"""Labelling: schema of the labels table, post-processing, the predictor actor and the Ray Data plan."""
