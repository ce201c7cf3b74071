//! Integration tests and the in-tree test guests of Nyx.
