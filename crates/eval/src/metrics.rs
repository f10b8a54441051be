//! Scores for predictions.
