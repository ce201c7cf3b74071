//! Port 0x80, the POST diagnostic port. (being written)
