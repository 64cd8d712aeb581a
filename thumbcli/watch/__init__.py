"""Watch mode: the sources followed through inotify, their thumbnails made as files land, as a service."""
