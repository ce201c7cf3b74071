//! The ACPI tables a Nyx machine shows its guest. Nyx boots kernels
//! directly, with no firmware, so it writes the tables into guest memory
//! itself, as Cloud Hypervisor does; [`build`] returns them as blobs at
//! their guest-physical addresses, built with the rust-vmm `acpi_tables`
//! crate.
//!
//! Everything sits in the BIOS area from [`ACPI_TABLES_BASE`], where Linux
//! and Multiboot guests scan for the RSDP: the RSDP (revision 2, with an
//! RSDT and an XSDT), the FACS (64-byte aligned), the DSDT, the FADT (not
//! hardware-reduced: the PIIX4-style PM block of `nyx_devices::acpi_pm`,
//! SCI on IRQ 9, SMI_CMD 0xB2), the MADT (one local APIC, the IOAPIC, the
//! ISA overrides IRQ0 → GSI2 and the SCI on GSI 9 level/active-low, LINT1
//! NMI) and, when asked for, the HPET table.
//!
//! The DSDT declares the sleep states (`_S1_` with Nyx's SLP_TYP 3, `_S3_`,
//! `_S4_`, `_S5_` with QEMU's values), the legacy devices as QEMU's `pc`
//! machine does (COM1, RTC, HPET, PS/2 keyboard and mouse), one processor
//! device, and the platform devices that read the PM block's sensor
//! block: a lid (PNP0C0D), an AC adapter (ACPI0003), a battery (PNP0C0A)
//! and the thermal zone `\_TZ.TZ00`, with `\_GPE._E00`-`_E02` notifying
//! them when the PM block sets GPE0 bits 0-2. The power and sleep buttons
//! are ACPI fixed features and need no device.

use acpi_tables::aml::{
    self, And, Device, EISAName, Else, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Index,
    LessThan, Local, Memory32Fixed, Method, Multiply, Name, Notify, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Return, Scope, Store, IO, ONE, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::{facs::FACS, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml, AmlSink};
use nyx_devices::acpi_pm::{
    ACPI_DISABLE, ACPI_ENABLE, GPE0_BLK, GPE0_LEN, PM1_CNT_BLK, PM1_CNT_LEN, PM1_EVT_BLK, PM1_EVT_LEN, PM_TMR_BLK,
    PM_TMR_LEN, SCI_IRQ, SENSOR_BATTERY, SENSOR_BLK, SENSOR_FLAGS, SENSOR_FLAG_CHARGING, SENSOR_LEN, SENSOR_LID,
    SENSOR_TEMP, SLP_TYP_S1, SLP_TYP_S3, SLP_TYP_S4, SLP_TYP_S5, SMI_CMD,
};

/// Where the tables start: the RSDP first, then the other tables.
pub const ACPI_TABLES_BASE: u64 = 0x000e_0000;
/// The tables must end below this: the memory map reserves the BIOS ROM
/// area from here to 1 MiB on its own.
pub const ACPI_TABLES_LIMIT: u64 = 0x000f_0000;
/// The E820 type of [`AcpiTables::reserved`]: ACPI NVS, because the FACS,
/// which the OS writes its waking vector into and must keep across sleep,
/// lives there (the other tables may sit in NVS memory too).
pub const E820_ACPI_NVS: u32 = 4;

/// OEM ID of every table.
const OEM_ID: [u8; 6] = *b"NYXVMM";
const OEM_REVISION: u32 = 1;

/// The local APIC's address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The IOAPIC's address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The HPET's address.
pub const HPET_ADDR: u32 = 0xfed0_0000;
/// The size of the HPET's register block.
const HPET_LEN: u32 = 0x400;
/// The HPET's capabilities' low dword: vendor 0x8086, legacy replacement
/// capable, 64-bit counter, 3 timers, revision 1.
pub const HPET_BLOCK_ID: u32 = 0x8086_a201;
/// The RTC's CMOS register of the century.
const RTC_CENTURY: u8 = 0x32;
/// FADT IA-PC boot flags: legacy devices, an 8042.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
/// MADT flag: the machine has dual 8259s too.
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: active low, level triggered.
const INTI_ACTIVE_LOW_LEVEL: u16 = 0x000f;
/// MPS INTI flags: active high, level-triggered.
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0x000d;
/// The ISA IRQ of the PIT and the GSI it arrives at.
const PIT_IRQ: u8 = 0;
const PIT_GSI: u32 = 2;

/// Thermal zone trip points in tenths of a kelvin.
const fn deci_kelvin(celsius: u32) -> u32 {
    celsius * 10 + 2732
}
const TZ_PASSIVE: u32 = deci_kelvin(80);
const TZ_HOT: u32 = deci_kelvin(95);
const TZ_CRITICAL: u32 = deci_kelvin(100);
/// Battery design values: the capacity is in mWh, 100 per percent.
const BAT_CAPACITY_MWH: u32 = 10_000;
const BAT_MWH_PER_PERCENT: u8 = 100;
const BAT_VOLTAGE_MV: u32 = 12_000;

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Bytes of RAM below 4 GiB; the tables need RAM up to 1 MiB.
    pub ram_below_4g: u64,
    /// The machine has the HPET at [`HPET_ADDR`]: an HPET table and an
    /// HPET device in the DSDT.
    pub hpet: bool,
    /// Processors: a MADT local APIC entry each, APIC IDs 0..cpus.
    pub cpus: u8,
}

/// The tables as the loader writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// The RSDP's guest-physical address (for `boot_params.acpi_rsdp_addr`).
    pub rsdp_addr: u64,
    /// Every blob to write: (guest physical address, bytes).
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// The guest-physical range to reserve in the E820 map, as type
    /// [`E820_ACPI_NVS`]: every blob, rounded out to whole pages.
    pub reserved: std::ops::Range<u64>,
}

/// Why the tables could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The tables' area is not RAM.
    #[error("the ACPI tables need RAM up to 1 MiB, but RAM below 4 GiB is only {0:#x} bytes")]
    NoRam(u64),
    /// The tables grew past [`ACPI_TABLES_LIMIT`].
    #[error("the ACPI tables would end at {0:#x}, past {ACPI_TABLES_LIMIT:#x}")]
    TooLarge(u64),
}

/// The bytes of an AML object.
fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// `ThermalZone (name) { children }`: encoded like a Device, with the
/// ThermalZone opcode.
struct ThermalZone<'a>(Device<'a>);

impl Aml for ThermalZone<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mut b = bytes_of(&self.0);
        // ExtOpPrefix, then DeviceOp (0x82) becomes ThermalZoneOp (0x85).
        debug_assert_eq!(b[..2], [0x5b, 0x82]);
        b[1] = 0x85;
        sink.vec(&b);
    }
}

/// `IRQNoFlags () { irq }`: the small IRQ descriptor QEMU gives ISA devices.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22);
        sink.word(1u16 << (self.0 & 15));
    }
}

/// The OEM table ID of table `sig`: "NYX" and the signature.
fn table_id(sig: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"NYX     ";
    id[3..7].copy_from_slice(sig);
    id
}

/// An empty table of `length` bytes (header included).
fn sdt(sig: [u8; 4], length: u32, revision: u8) -> Sdt {
    Sdt::new(sig, length, revision, OEM_ID, table_id(&sig), OEM_REVISION)
}

/// The DSDT's AML, after its header.
fn dsdt_body(cfg: &AcpiConfig) -> Vec<u8> {
    // The sensor fields below are laid out in this order.
    const _: () = assert!(SENSOR_LID == 0 && SENSOR_BATTERY == 1 && SENSOR_FLAGS == 2 && SENSOR_TEMP == 4);
    let mut out = Vec::new();

    for (name, typ) in [
        ("\\_S1_", SLP_TYP_S1),
        ("\\_S3_", SLP_TYP_S3),
        ("\\_S4_", SLP_TYP_S4),
        ("\\_S5_", SLP_TYP_S5),
    ] {
        Name::new(Path::new(name), &Package::new(vec![&typ, &typ, &ZERO, &ZERO])).to_aml_bytes(&mut out);
    }

    let mut sb = Vec::new();
    OpRegion::new("NYXS".into(), OpRegionSpace::SystemIO, &SENSOR_BLK, &SENSOR_LEN).to_aml_bytes(&mut sb);
    aml::Field::new(
        "NYXS".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Named(*b"LIDS", 8),
            FieldEntry::Named(*b"BATP", 8),
            FieldEntry::Named(*b"BATF", 8),
        ],
    )
    .to_aml_bytes(&mut sb);
    // The temperature is read as one word, so it cannot tear.
    aml::Field::new(
        "NYXS".into(),
        FieldAccessType::Word,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Reserved(usize::from(SENSOR_TEMP) * 8),
            FieldEntry::Named(*b"TMPK", 16),
        ],
    )
    .to_aml_bytes(&mut sb);

    // The processor, for the thermal zone's passive cooling list.
    Device::new(
        "CPU0".into(),
        vec![&Name::new("_HID".into(), &"ACPI0007"), &Name::new("_UID".into(), &ZERO)],
    )
    .to_aml_bytes(&mut sb);

    Device::new(
        "LID0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0D")),
            &Method::new("_LID".into(), 0, false, vec![&Return::new(&Path::new("LIDS"))]),
        ],
    )
    .to_aml_bytes(&mut sb);

    let sb_path = Path::new("\\_SB_");
    let power_source = Package::new(vec![&sb_path]);
    Device::new(
        "ADP0".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0003"),
            &Name::new("_PCL".into(), &power_source),
            &Method::new(
                "_PSR".into(),
                0,
                false,
                vec![&Return::new(&And::new(
                    &ZERO,
                    &Path::new("BATF"),
                    &SENSOR_FLAG_CHARGING,
                ))],
            ),
        ],
    )
    .to_aml_bytes(&mut sb);

    let bif = Package::new(vec![
        &ZERO, // power unit: mW/mWh
        &BAT_CAPACITY_MWH,
        &BAT_CAPACITY_MWH, // last full charge
        &ONE,              // rechargeable
        &BAT_VOLTAGE_MV,
        &(BAT_CAPACITY_MWH / 10), // warning level
        &(BAT_CAPACITY_MWH / 20), // low level
        &(BAT_CAPACITY_MWH / 100),
        &(BAT_CAPACITY_MWH / 100),
        &"NYX-BAT0",
        &"0001",
        &"LION",
        &"Nyx",
    ]);
    // State 1 discharging, 2 charging, 0 full on external power.
    let bst = Package::new(vec![&ONE, &u32::MAX, &ZERO, &BAT_VOLTAGE_MV]);
    Device::new(
        "BAT0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0A")),
            &Name::new("_UID".into(), &ONE),
            &Name::new("_PCL".into(), &power_source),
            &Method::new("_STA".into(), 0, false, vec![&Return::new(&0x1fu8)]),
            &Method::new("_BIF".into(), 0, false, vec![&Return::new(&bif)]),
            &Method::new(
                "_BST".into(),
                0,
                true,
                vec![
                    &Store::new(&Local(0), &bst),
                    &Store::new(&Local(1), &ONE),
                    &If::new(
                        &And::new(&ZERO, &Path::new("BATF"), &SENSOR_FLAG_CHARGING),
                        vec![
                            &If::new(
                                &LessThan::new(&Path::new("BATP"), &100u8),
                                vec![&Store::new(&Local(1), &2u8)],
                            ),
                            &Else::new(vec![&Store::new(&Local(1), &ZERO)]),
                        ],
                    ),
                    &Store::new(&Index::new(&ZERO, &Local(0), &ZERO), &Local(1)),
                    &Store::new(
                        &Index::new(&ZERO, &Local(0), &2u8),
                        &Multiply::new(&ZERO, &Path::new("BATP"), &BAT_MWH_PER_PERCENT),
                    ),
                    &Return::new(&Local(0)),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut sb);

    // The legacy devices, as QEMU's pc machine declares them.
    let sta_present = Name::new("_STA".into(), &0x0fu8);
    Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &ONE),
            &sta_present,
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&IO::new(0x3f8, 0x3f8, 0, 8), &IrqNoFlags(4)]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    Device::new(
        "RTC_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0B00")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&IO::new(0x70, 0x70, 1, 8), &IrqNoFlags(8)]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    if cfg.hpet {
        Device::new(
            "HPET".into(),
            vec![
                &Name::new("_HID".into(), &EISAName::new("PNP0103")),
                &Name::new("_UID".into(), &ZERO),
                &sta_present,
                &Name::new(
                    "_CRS".into(),
                    &ResourceTemplate::new(vec![&Memory32Fixed::new(false, HPET_ADDR, HPET_LEN)]),
                ),
            ],
        )
        .to_aml_bytes(&mut sb);
    }
    Device::new(
        "KBD_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &sta_present,
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(0x60, 0x60, 1, 1),
                    &IO::new(0x64, 0x64, 1, 1),
                    &IrqNoFlags(1),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    Device::new(
        "MOU_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0F13")),
            &sta_present,
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&IrqNoFlags(12)])),
        ],
    )
    .to_aml_bytes(&mut sb);
    pci_root(cfg).to_aml_bytes(&mut sb);
    out.extend(Scope::raw("\\_SB_".into(), sb));

    Scope::new(
        "\\_TZ_".into(),
        vec![&ThermalZone(Device::new(
            "TZ00".into(),
            vec![
                &Method::new("_TMP".into(), 0, false, vec![&Return::new(&Path::new("\\_SB_.TMPK"))]),
                &Name::new("_PSV".into(), &TZ_PASSIVE),
                &Name::new("_HOT".into(), &TZ_HOT),
                &Name::new("_CRT".into(), &TZ_CRITICAL),
                &Name::new("_PSL".into(), &Package::new(vec![&Path::new("\\_SB_.CPU0")])),
                &Name::new("_TC1".into(), &4u8),
                &Name::new("_TC2".into(), &3u8),
                // Tenths of a second: sample every second in passive
                // cooling, poll every 100 ms.
                &Name::new("_TSP".into(), &10u8),
                &Name::new("_TZP".into(), &ONE),
            ],
        ))],
    )
    .to_aml_bytes(&mut out);

    let notify = |path: &str| bytes_of(&Notify::new(&Path::new(path), &0x80u8));
    Scope::new(
        "\\_GPE".into(),
        vec![
            &Method::new("_E00".into(), 0, false, vec![&Raw(notify("\\_SB_.LID0"))]),
            &Method::new(
                "_E01".into(),
                0,
                false,
                vec![&Raw(notify("\\_SB_.ADP0")), &Raw(notify("\\_SB_.BAT0"))],
            ),
            &Method::new("_E02".into(), 0, false, vec![&Raw(notify("\\_TZ_.TZ00"))]),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// AML bytes built earlier.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn io_gas(bits: u16, port: u16) -> GAS {
    // Access size left undefined, as QEMU's FADT for the PIIX4 PM block.
    GAS::new(
        AddressSpace::SystemIo,
        bits as u8 * 8,
        0,
        AccessSize::Undefined,
        u64::from(port),
    )
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::RtcS4);
    // The tables live below 1 MiB, so the 32-bit pointers hold them too.
    f.firmware_ctrl = (facs as u32).into();
    f.x_firmware_ctrl = facs.into();
    f.dsdt = (dsdt as u32).into();
    f.x_dsdt = dsdt.into();
    f.sci_int = u16::from(SCI_IRQ).into();
    f.smi_cmd = u32::from(SMI_CMD).into();
    f.acpi_enable = ACPI_ENABLE;
    f.acpi_disable = ACPI_DISABLE;
    f.pm1a_evt_blk = u32::from(PM1_EVT_BLK).into();
    f.pm1a_cnt_blk = u32::from(PM1_CNT_BLK).into();
    f.pm_tmr_blk = u32::from(PM_TMR_BLK).into();
    f.gpe0_blk = u32::from(GPE0_BLK).into();
    f.pm1_evt_len = PM1_EVT_LEN as u8;
    f.pm1_cnt_len = PM1_CNT_LEN as u8;
    f.pm_tmr_len = PM_TMR_LEN as u8;
    f.gpe0_blk_len = GPE0_LEN as u8;
    // No C2 or C3 (latencies over 100 and 1000 us), as QEMU.
    f.p_lvl2_lat = 0x0fff.into();
    f.p_lvl3_lat = 0x03e9.into();
    f.century = RTC_CENTURY;
    f.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042).into();
    f.x_pm1a_evt_blk = io_gas(PM1_EVT_LEN, PM1_EVT_BLK);
    f.x_pm1a_cnt_blk = io_gas(PM1_CNT_LEN, PM1_CNT_BLK);
    f.x_pm_tmr_blk = io_gas(PM_TMR_LEN, PM_TMR_BLK);
    f.x_gpe0_blk = io_gas(GPE0_LEN, GPE0_BLK);
    bytes_of(&f.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut t = sdt(*b"APIC", 44, 1);
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, MADT_PCAT_COMPAT);
    // ACPI processor UID = APIC ID, as QEMU numbers them.
    for id in 0..cpus.max(1) {
        t.append_slice(&bytes_of(&ProcessorLocalApic::new(id, id, EnabledStatus::Enabled)));
    }
    t.append_slice(&bytes_of(&IoApic::new(0, IOAPIC_ADDR, 0)));
    let iso = |irq: u8, gsi: u32, flags: u16| {
        let mut e = vec![2, 10, 0, irq];
        e.extend(gsi.to_le_bytes());
        e.extend(flags.to_le_bytes());
        e
    };
    // Flags 0: conforming to the ISA bus (edge, active high), as QEMU.
    t.append_slice(&iso(PIT_IRQ, PIT_GSI, 0));
    t.append_slice(&iso(SCI_IRQ, u32::from(SCI_IRQ), INTI_ACTIVE_LOW_LEVEL));
    // The PCI interrupt lines (PIRQ A-D on IRQs 10 and 11, and 5, which
    // QEMU lists too): level, active high, as QEMU's MADT says.
    for irq in [5u8, 10, 11] {
        t.append_slice(&iso(irq, u32::from(irq), INTI_ACTIVE_HIGH_LEVEL));
    }
    // Local APIC NMI: every processor, flags conforming, LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.as_slice().to_vec()
}

/// The PCI root bridge (`\_SB_.PCI0`): bus 0, the configuration ports,
/// the host's BAR windows as its resources, and `_PRT`, the PIIX swizzle of
/// every slot's INTA-INTD onto the GSIs of [`crate::platform::intx_gsi`];
/// then a motherboard resource holding the ECAM window, so that an OS
/// trusts the MCFG.
fn pci_root(cfg: &AcpiConfig) -> impl Aml {
    use acpi_tables::aml::AddressSpace as Window;
    use acpi_tables::aml::AddressSpaceCacheable::NotCacheable;
    use nyx_devices::ioapic::IOAPIC_BASE;
    use nyx_devices::pci::{ECAM_BASE, ECAM_SIZE, MMIO64_WINDOW};

    struct PciRoot(Vec<u8>);
    impl Aml for PciRoot {
        fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
            sink.vec(&self.0);
        }
    }

    let mut prt_entries: Vec<Vec<u32>> = Vec::new();
    for slot in 1u8..32 {
        for pin in 0u8..4 {
            let gsi = crate::platform::intx_gsi(slot, pin + 1);
            prt_entries.push(vec![
                (u32::from(slot) << 16) | 0xFFFF,
                u32::from(pin),
                0,
                u32::from(gsi),
            ]);
        }
    }
    let prt_packages: Vec<Package> = prt_entries
        .iter()
        .map(|e| Package::new(vec![&e[0], &e[1], &e[2], &e[3]]))
        .collect();
    let prt = Package::new(prt_packages.iter().map(|p| p as &dyn Aml).collect());

    let bus = Window::<u16>::new_bus_number(0, 0);
    let cfg_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = Window::<u16>::new_io(0, 0xcf7, None);
    let io_high = Window::<u16>::new_io(0xd00, 0xffff, None);
    let ram_top = (cfg.ram_below_4g as u32).min(ECAM_BASE as u32);
    let mem_low = Window::<u32>::new_memory(NotCacheable, true, ram_top, ECAM_BASE as u32 - 1, None);
    let mem_high = Window::<u32>::new_memory(
        NotCacheable,
        true,
        (ECAM_BASE + ECAM_SIZE) as u32,
        IOAPIC_BASE as u32 - 1,
        None,
    );
    let mem64 = Window::<u64>::new_memory(
        NotCacheable,
        true,
        MMIO64_WINDOW.0,
        MMIO64_WINDOW.0 + MMIO64_WINDOW.1 - 1,
        None,
    );
    let mut crs: Vec<&dyn Aml> = vec![&bus, &cfg_ports, &io_low, &io_high];
    if u64::from(ram_top) < ECAM_BASE {
        crs.push(&mem_low);
    }
    crs.push(&mem_high);
    crs.push(&mem64);
    let crs = ResourceTemplate::new(crs);

    let mut out = Vec::new();
    Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &ZERO),
            &Name::new("_SEG".into(), &ZERO),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_BBN".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
            &Name::new("_PRT".into(), &prt),
        ],
    )
    .to_aml_bytes(&mut out);
    Device::new(
        "MRES".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &ONE),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Memory32Fixed::new(false, ECAM_BASE as u32, ECAM_SIZE as u32)]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    PciRoot(out)
}

/// The MCFG: the PCI host's ECAM window for bus 0.
fn mcfg() -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, table_id(b"MCFG"), OEM_REVISION);
    t.add_ecam(nyx_devices::pci::ECAM_BASE, 0, 0, 0);
    bytes_of(&t)
}

fn hpet() -> Vec<u8> {
    let mut t = sdt(*b"HPET", 56, 1);
    t.write_u32(36, HPET_BLOCK_ID);
    // Base address: system memory, widths 0 (as QEMU).
    t.write_u64(44, u64::from(HPET_ADDR));
    // HPET number 0, minimum tick 0, no page protection.
    t.as_slice().to_vec()
}

/// Places blobs one after the other.
struct Layout {
    next: u64,
    blobs: Vec<(u64, Vec<u8>)>,
}

impl Layout {
    fn place(&mut self, align: u64, bytes: Vec<u8>) -> u64 {
        let at = self.next.next_multiple_of(align);
        self.next = at + bytes.len() as u64;
        self.blobs.push((at, bytes));
        at
    }
}

/// Builds every table for `cfg`.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    if cfg.ram_below_4g < 0x10_0000 {
        return Err(AcpiError::NoRam(cfg.ram_below_4g));
    }
    let rsdp_addr = ACPI_TABLES_BASE;
    let mut l = Layout {
        next: rsdp_addr + Rsdp::len() as u64,
        blobs: Vec::new(),
    };
    let facs = l.place(64, bytes_of(&FACS::new()));

    let mut dsdt = sdt(*b"DSDT", 36, 2);
    dsdt.append_slice(&dsdt_body(cfg));
    let dsdt = l.place(16, dsdt.as_slice().to_vec());

    let mut tables = vec![l.place(16, fadt(facs, dsdt)), l.place(16, madt(cfg.cpus))];
    if cfg.hpet {
        tables.push(l.place(16, hpet()));
    }
    tables.push(l.place(16, mcfg()));

    let mut rsdt = sdt(*b"RSDT", 36, 1);
    for t in &tables {
        rsdt.append_slice(&(*t as u32).to_le_bytes());
    }
    let rsdt = l.place(16, rsdt.as_slice().to_vec());
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    for t in &tables {
        xsdt.add_entry(*t);
    }
    let xsdt = l.place(16, bytes_of(&xsdt));

    // The crate's RSDP has no RSDT address: put it in and redo both sums.
    let mut rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt));
    rsdp[16..20].copy_from_slice(&(rsdt as u32).to_le_bytes());
    rsdp[8] = 0;
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = 0;
    rsdp[32] = checksum(&rsdp);
    l.blobs.insert(0, (rsdp_addr, rsdp));

    if l.next > ACPI_TABLES_LIMIT {
        return Err(AcpiError::TooLarge(l.next));
    }
    Ok(AcpiTables {
        rsdp_addr,
        blobs: l.blobs,
        reserved: ACPI_TABLES_BASE..l.next.next_multiple_of(0x1000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path as FsPath;
    use std::process::Command;

    fn cfg() -> AcpiConfig {
        AcpiConfig {
            ram_below_4g: 256 << 20,
            hpet: true,
            cpus: 1,
        }
    }

    /// The tables' area of guest memory, as the guest sees it.
    fn image(t: &AcpiTables) -> Vec<u8> {
        let mut mem = vec![0u8; (0x10_0000 - ACPI_TABLES_BASE) as usize];
        for (at, b) in &t.blobs {
            let off = (at - ACPI_TABLES_BASE) as usize;
            mem[off..off + b.len()].copy_from_slice(b);
        }
        mem
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// The table at `addr` in the image, checked for length and checksum.
    fn table(mem: &[u8], addr: u64) -> &[u8] {
        let off = (addr - ACPI_TABLES_BASE) as usize;
        let len = u32_at(mem, off + 4) as usize;
        assert!(
            len >= 36 && off + len <= mem.len(),
            "table at {addr:#x} has length {len}"
        );
        let t = &mem[off..off + len];
        assert_eq!(sum(t), 0, "checksum of {}", String::from_utf8_lossy(&t[..4]));
        t
    }

    /// The blob of table `sig`.
    fn blob<'a>(t: &'a AcpiTables, sig: &[u8]) -> &'a [u8] {
        &t.blobs.iter().find(|(_, b)| b.starts_with(sig)).unwrap().1
    }

    #[test]
    fn every_table_sums_to_zero() {
        for hpet in [true, false] {
            let t = build(&AcpiConfig { hpet, ..cfg() }).unwrap();
            for (at, b) in &t.blobs {
                match &b[..4] {
                    b"RSD " => {
                        assert_eq!(b.len(), 36);
                        assert_eq!(sum(&b[..20]), 0, "RSDP 1.0 checksum");
                        assert_eq!(sum(b), 0, "RSDP extended checksum");
                    }
                    b"FACS" => assert_eq!(b.len(), 64),
                    sig => {
                        assert_eq!(sum(b), 0, "checksum of {}", String::from_utf8_lossy(sig));
                        assert_eq!(u32_at(b, 4) as usize, b.len());
                        assert_eq!(&b[10..16], b"NYXVMM");
                    }
                }
                assert!(t.reserved.contains(at) && at + b.len() as u64 <= t.reserved.end);
            }
            // A checksum that is wrong is seen.
            let mut bad = t.blobs[1].1.clone();
            bad[20] ^= 1;
            assert_ne!(sum(&bad), 0);
        }
    }

    #[test]
    fn layout_fits_the_bios_area_and_does_not_overlap() {
        let t = build(&cfg()).unwrap();
        assert_eq!(t.rsdp_addr, ACPI_TABLES_BASE);
        assert_eq!(t.reserved.start, ACPI_TABLES_BASE);
        assert!(t.reserved.end <= ACPI_TABLES_LIMIT);
        assert_eq!(t.reserved.end % 0x1000, 0);
        let mut spans: Vec<_> = t.blobs.iter().map(|(a, b)| (*a, *a + b.len() as u64)).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        let facs = t.blobs.iter().find(|(_, b)| b.starts_with(b"FACS")).unwrap().0;
        assert_eq!(facs % 64, 0);
        assert!(t.blobs.iter().all(|(a, _)| a % 16 == 0));
        assert_eq!(
            build(&AcpiConfig {
                ram_below_4g: 0xF_FFFF,
                ..cfg()
            }),
            Err(AcpiError::NoRam(0xF_FFFF))
        );
    }

    /// Finds the RSDP as Linux does (16-byte steps over 0xE0000-0xFFFFF,
    /// both checksums) and walks RSDT, XSDT and the FADT's pointers.
    #[test]
    fn rsdp_leads_to_every_table() {
        for hpet in [true, false] {
            let t = build(&AcpiConfig { hpet, ..cfg() }).unwrap();
            let mem = image(&t);
            let rsdp_off = (0..mem.len())
                .step_by(16)
                .find(|&o| mem[o..].starts_with(b"RSD PTR ") && sum(&mem[o..o + 20]) == 0 && sum(&mem[o..o + 36]) == 0)
                .unwrap();
            assert_eq!(ACPI_TABLES_BASE + rsdp_off as u64, t.rsdp_addr);
            let rsdp = &mem[rsdp_off..rsdp_off + 36];
            assert_eq!(rsdp[15], 2, "revision");
            assert_eq!(u32_at(rsdp, 20), 36);
            let rsdt = table(&mem, u64::from(u32_at(rsdp, 16)));
            let xsdt = table(&mem, u64_at(rsdp, 24));
            assert_eq!(&rsdt[..4], b"RSDT");
            assert_eq!(&xsdt[..4], b"XSDT");
            let x: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
            let r: Vec<u64> = rsdt[36..].chunks(4).map(|c| u64::from(u32_at(c, 0))).collect();
            assert_eq!(x, r);
            let sigs: Vec<&[u8]> = x.iter().map(|&a| &table(&mem, a)[..4]).collect();
            let mut expected: Vec<&[u8]> = vec![b"FACP", b"APIC"];
            if hpet {
                expected.push(b"HPET");
            }
            expected.push(b"MCFG");
            assert_eq!(sigs, expected);

            let fadt = table(&mem, x[0]);
            let facs = u64::from(u32_at(fadt, 36));
            assert_eq!(u64_at(fadt, 132), facs, "X_FIRMWARE_CTRL");
            let off = (facs - ACPI_TABLES_BASE) as usize;
            assert_eq!(&mem[off..off + 4], b"FACS");
            assert_eq!(u32_at(&mem, off + 4), 64);
            let dsdt = u64::from(u32_at(fadt, 40));
            assert_eq!(u64_at(fadt, 140), dsdt, "X_DSDT");
            let dsdt = table(&mem, dsdt);
            assert_eq!(&dsdt[..4], b"DSDT");
            assert_eq!(dsdt[8], 2, "64-bit integers");
            let has = |s: &[u8]| dsdt.windows(s.len()).any(|w| w == s);
            assert_eq!(has(b"HPET"), hpet);
            assert!(has(b"_S5_") && has(b"TZ00"));
        }
    }

    #[test]
    fn fadt_describes_the_pm_block() {
        let t = build(&cfg()).unwrap();
        let f = blob(&t, b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "revision");
        assert_eq!(u16_at(f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0xb2, "SMI_CMD");
        assert_eq!((f[52], f[53]), (0xf1, 0xf0), "ACPI_ENABLE/DISABLE");
        assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
        assert_eq!(u32_at(f, 80), 0xafe0, "GPE0_BLK");
        assert_eq!(
            &f[88..93],
            &[4, 2, 0, 4, 4],
            "PM1_EVT/PM1_CNT/PM2_CNT/PM_TMR/GPE0 lengths"
        );
        assert_eq!(f[108], 0x32, "CENTURY");
        assert_eq!(u16_at(f, 109), 0x3, "IAPC_BOOT_ARCH");
        let flags = u32_at(f, 112);
        assert_eq!(flags, 1 | 1 << 2 | 1 << 7, "WBINVD, PROC_C1, RTC_S4");
        assert_eq!(
            flags & (1 << 4 | 1 << 5 | 1 << 20),
            0,
            "fixed buttons, not hardware-reduced"
        );
        // X_PM1a_EVT_BLK: system I/O, 32 bits, at 0x600.
        assert_eq!(&f[148..152], &[1, 32, 0, 0]);
        assert_eq!(u64_at(f, 152), 0x600);
        // X_PM1a_CNT_BLK, X_PM_TMR_BLK and X_GPE0_BLK; no PM1b, PM2, GPE1.
        assert_eq!(u64_at(f, 176), 0x604);
        assert_eq!(&f[208..212], &[1, 32, 0, 0]);
        assert_eq!(u64_at(f, 212), 0x608);
        assert_eq!(u64_at(f, 224), 0xafe0);
        for gas in [160, 184, 196, 232, 244, 256] {
            assert_eq!(&f[gas..gas + 12], &[0; 12], "GAS at {gas}");
        }
    }

    #[test]
    fn madt_and_hpet_content() {
        let t = build(&cfg()).unwrap();
        let m = blob(&t, b"APIC");
        assert_eq!(u32_at(m, 36), 0xfee0_0000);
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
        let mut entries = Vec::new();
        let mut off = 44;
        while off < m.len() {
            let len = m[off + 1] as usize;
            entries.push(&m[off..off + len]);
            off += len;
        }
        assert_eq!(off, m.len());
        assert_eq!(entries[0], &[0, 8, 0, 0, 1, 0, 0, 0][..], "local APIC 0 enabled");
        assert_eq!(entries[1], &[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0][..], "IOAPIC");
        assert_eq!(entries[2], &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0][..], "IRQ0 -> GSI2");
        assert_eq!(
            entries[3],
            &[2, 10, 0, 9, 9, 0, 0, 0, 0x0f, 0][..],
            "SCI level, active low"
        );
        for (i, irq) in [5u8, 10, 11].into_iter().enumerate() {
            assert_eq!(
                entries[4 + i],
                &[2, 10, 0, irq, irq, 0, 0, 0, 0x0d, 0][..],
                "PCI IRQ {irq} level high"
            );
        }
        assert_eq!(entries[7], &[4, 6, 0xff, 0, 0, 1][..], "NMI on LINT1");
        assert_eq!(entries.len(), 8);
        // Four CPUs: four local APIC entries first, IDs 0..3, the rest as
        // before.
        let t4 = build(&AcpiConfig { cpus: 4, ..cfg() }).unwrap();
        let m4 = blob(&t4, b"APIC");
        for id in 0..4u8 {
            let off = 44 + 8 * usize::from(id);
            assert_eq!(&m4[off..off + 8], &[0, 8, id, id, 1, 0, 0, 0][..], "local APIC {id}");
        }
        assert_eq!(&m4[44 + 32..], &m[44 + 8..], "the other entries follow unchanged");

        let c = blob(&t, b"MCFG");
        assert_eq!(c.len(), 60);
        assert_eq!(u64_at(c, 44), 0xc000_0000, "ECAM base");
        assert_eq!((u16_at(c, 52), c[54], c[55]), (0, 0, 0), "segment 0, bus 0 only");

        let h = blob(&t, b"HPET");
        assert_eq!(h.len(), 56);
        assert_eq!(u32_at(h, 36), 0x8086_a201);
        assert_eq!(h[40], 0, "system memory");
        assert_eq!(u64_at(h, 44), 0xfed0_0000);
        assert_eq!((h[52], u16_at(h, 53), h[55]), (0, 0, 0));
    }

    /// Runs `iasl` with `args` in `dir`: its output, or the output as the
    /// error when it failed or reported an error.
    fn iasl(dir: &FsPath, args: &[&str]) -> Result<String, String> {
        let out = Command::new("iasl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run iasl ({e}): install acpica-tools (apt-get install acpica-tools), \
                 or set NYX_SKIP_IASL=1 to skip this test"
                )
            });
        let text = format!(
            "iasl {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let reported = text.lines().any(|l| {
            let l = l.trim_start();
            // "Error    6126 - ..." lines, and the compiler's summary.
            l.starts_with("Error")
                || l.split(", ")
                    .any(|p| p.ends_with(" Errors") && !p.ends_with(" 0 Errors"))
        });
        if out.status.success() && !reported {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// iasl disassembles every table without error, recompiles the DSDT's
    /// disassembly without error, and finds what the tables should hold.
    #[test]
    fn iasl_disassembles_every_table() {
        if std::env::var("NYX_SKIP_IASL").is_ok_and(|v| v == "1") {
            eprintln!("NYX_SKIP_IASL=1: not running iasl");
            return;
        }
        let t = build(&cfg()).unwrap();
        let dir = std::env::temp_dir().join(format!("nyx-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut dsl = std::collections::BTreeMap::new();
        for (_, b) in &t.blobs {
            // This iasl takes no RSDP file; rsdp_leads_to_every_table checks it.
            if b.starts_with(b"RSD PTR ") {
                continue;
            }
            let sig = String::from_utf8_lossy(&b[..4]).into_owned();
            let name = format!("{}.dat", sig.to_ascii_lowercase());
            std::fs::write(dir.join(&name), b).unwrap();
            iasl(&dir, &["-d", &name]).unwrap();
            let text = std::fs::read_to_string(dir.join(name.replace(".dat", ".dsl"))).unwrap();
            dsl.insert(sig, text);
        }
        let keys: Vec<&str> = dsl.keys().map(String::as_str).collect();
        assert_eq!(keys, ["APIC", "DSDT", "FACP", "FACS", "HPET", "MCFG", "RSDT", "XSDT"]);
        let dsdt = &dsl["DSDT"];
        for want in [
            "_S1_",
            "_S3_",
            "_S4_",
            "_S5_",
            "PNP0C0D",
            "PNP0C0A",
            "ACPI0003",
            "ACPI0007",
            "PNP0501",
            "PNP0B00",
            "PNP0103",
            "PNP0303",
            "PNP0F13",
            "PNP0A03",
            "PNP0C02",
            "_PRT",
            "WordBusNumber",
            "0xC0100000",
            "0xFEBFFFFF",
            "0x0000002000000000",
            "ThermalZone (TZ00)",
            "_TMP",
            "_PSV",
            "_HOT",
            "_CRT",
            "_PSL",
            "_TC1",
            "_TC2",
            "_TSP",
            "_TZP",
            "_E00",
            "_E01",
            "_E02",
            "Notify (\\_SB.LID0, 0x80)",
            "Notify (\\_TZ.TZ00, 0x80)",
            "OperationRegion (NYXS, SystemIO, 0x0610, 0x08)",
            "IRQNoFlags ()",
            "Memory32Fixed (ReadOnly,",
            "0xFED00000",
        ] {
            assert!(dsdt.contains(want), "DSDT disassembly lacks {want:?}:\n{dsdt}");
        }
        let fadt = &dsl["FACP"];
        for want in [
            "SCI Interrupt : 0009",
            "SMI Command Port : 000000B2",
            "PM1A Event Block Address : 00000600",
        ] {
            let squeezed: String = fadt.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(squeezed.contains(want), "FADT disassembly lacks {want:?}:\n{fadt}");
        }
        assert!(dsl["APIC"].contains("Interrupt Source Override"));
        assert!(dsl["HPET"].contains("8086A201"));
        // The DSDT's source compiles back without errors, and a source
        // with an error is caught.
        let compiled = iasl(&dir, &["-p", "recompiled", "dsdt.dsl"]).unwrap();
        assert!(compiled.contains(" 0 Errors"), "{compiled}");
        let broken = dsdt.replace("Return (LIDS)", "Return (LIDS");
        std::fs::write(dir.join("broken.dsl"), broken).unwrap();
        let err = iasl(&dir, &["-p", "broken", "broken.dsl"]).unwrap_err();
        assert!(err.contains("Error"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
