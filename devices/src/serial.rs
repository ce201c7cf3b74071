//! The 16550A UART. (being written)
