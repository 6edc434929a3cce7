"""Models: encoder factory over timm, MAE, contrastive heads, preprocessing."""
