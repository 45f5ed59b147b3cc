"""Wire contract of the CREST selection service (generated code plus array codecs)."""
