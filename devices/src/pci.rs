//! PCI configuration mechanism #1 with only the host bridge. (being written)
