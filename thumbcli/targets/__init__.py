"""Where thumbnails go: an output tree, the served cache or the desktop cache; each plans, writes and prunes."""
