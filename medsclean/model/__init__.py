"""The networks and their training: the frozen encoder (the only module that imports timm), the decoder, losses, optimiser, training loops."""
