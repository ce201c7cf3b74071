//! The 8254 programmable interval timer and port 0x61. (being written)
