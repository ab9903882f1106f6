"""Running a conversion: the loader and saver processes and their queue, several workers, torchrun,
staging and publishing the target, the manifest, progress."""
