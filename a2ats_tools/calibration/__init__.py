"""Stage 1: run the model over calibration text and record pre-RoPE keys and WRoPE query statistics."""
