"""The work folder: the artifact store, runs, image discovery and decoding, the export tree."""
