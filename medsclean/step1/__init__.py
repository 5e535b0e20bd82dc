"""Step 1: random sparse memory banks and the engines that score every patch against them."""
