"""The engine: one source's thumbnails made once (`engine`), in one worker pool (`pool`), driven by the local
pipeline, a cluster task, generate-on-miss and watch mode."""
