"""quickstart-offload: a Flower app whose payloads can travel out of band."""
