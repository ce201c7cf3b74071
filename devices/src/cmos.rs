//! The MC146818 CMOS RTC and NVRAM. (being written)
