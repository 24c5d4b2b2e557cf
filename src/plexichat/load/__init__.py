"""Load generation, the P2P relay scenario and the loss checker of PlexiChat."""
