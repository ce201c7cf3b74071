//! Boot loaders (being written).
