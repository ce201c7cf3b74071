//! The in-tree test guests (being written).
