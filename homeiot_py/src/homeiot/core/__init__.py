"""The pure core: values, codecs and rules. No I/O, no clock, no client libraries."""
