//! virtio-net end to end with the `netping` guest (an ARP request and a UDP
//! datagram every 20 ms until it has seen both from a peer): alone on a
//! link whose other end only listens, it sends exactly the frames QEMU's
//! does and prints QEMU's golden; two Nyx processes joined by a Unix
//! stream socket each receive the other's frames, and one's capture file
//! shows both sides' frames to `tcpdump -r`; a Nyx and a QEMU (the
//! same guest, `-netdev stream`) do too, and the Nyx side's recording
//! replays bit for bit three times with no network at all.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{guest, kvm_available, nyx};

/// `nyx ARGS... --kernel netping --net virtio,stream=unix:SOCK...`.
fn netping(args: &[&str], sock: &Path, net_extra: &str) -> Command {
    let mut c = nyx();
    c.args(args)
        .arg("--kernel")
        .arg(guest("netping"))
        .args(["--cmdline", nyx_guests::GOLDEN_APPEND, "--net"])
        .arg(format!("virtio,stream=unix:{}{net_extra}", sock.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The records of a stream backend: (length, frame) pairs.
fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let n = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert!(bytes.len() >= 4 + n, "a cut record");
        out.push(bytes[4..4 + n].to_vec());
        bytes = &bytes[4 + n..];
    }
    assert!(bytes.is_empty(), "bytes after the last record");
    out
}

#[test]
fn a_lone_guest_sends_qemus_frames_and_prints_qemus_golden() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let child = netping(&["run"], &sock, "").spawn().unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        conn.read_to_end(&mut all).unwrap();
        all
    });
    let out = child.wait_with_output().unwrap();
    let sent = frames(&reader.join().unwrap());
    assert_eq!(
        out.status.code(),
        Some(nyx_guests::NETPING_EXIT as i32),
        "{}",
        text(&out.stderr)
    );
    let golden = nyx_guests::expected("netping").unwrap().golden.unwrap();
    assert_eq!(text(&out.stdout), golden);
    let (arp, udp) = (
        nyx_guests::netping_arp_request(nyx_guests::NETPING_MAC),
        nyx_guests::netping_udp_datagram(nyx_guests::NETPING_MAC),
    );
    assert!(sent.len() >= 100, "a pair of frames every tick for 3 s: {}", sent.len());
    for pair in sent.chunks(2) {
        assert_eq!(pair[0], arp);
        if let Some(u) = pair.get(1) {
            assert_eq!(u, &udp);
        }
    }
}

#[test]
fn two_nyx_guests_on_one_link_receive_each_others_frames() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let pcap = dir.path().join("a.pcap");
    let a = netping(&["run"], &sock, &format!(",server,capture={}", pcap.display()))
        .spawn()
        .unwrap();
    wait_for(&sock);
    let b = netping(&["run"], &sock, ",mac=52:54:00:12:34:57").spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let exit = Some(nyx_guests::NETPING_EXIT as i32);
    assert_eq!(a.status.code(), exit, "{}", text(&a.stderr));
    assert_eq!(b.status.code(), exit, "{}", text(&b.stderr));
    assert_eq!(text(&a.stdout), nyx_guests::NETPING_A_OUTPUT);
    assert_eq!(text(&b.stdout), nyx_guests::NETPING_B_OUTPUT);
    // The capture holds both guests' frames, as tcpdump reads them.
    let dump = match Command::new("tcpdump").args(["-nn", "-e", "-r"]).arg(&pcap).output() {
        Ok(d) => d,
        Err(e) => {
            assert!(
                std::env::var("NYX_REQUIRE_KVM").as_deref() != Ok("1"),
                "NYX_REQUIRE_KVM=1 but tcpdump cannot be run ({e}): install tcpdump"
            );
            return;
        }
    };
    let dump = text(&dump.stdout);
    for mac in ["52:54:00:12:34:56", "52:54:00:12:34:57"] {
        for what in [
            "Request who-has 10.0.2.2 tell 10.0.2.15",
            "10.0.2.15.5555 > 10.0.2.2.5555: UDP, length 14",
        ] {
            assert!(
                dump.lines()
                    .any(|l| l.contains(&format!("{mac} > ff:ff:ff:ff:ff:ff")) && l.contains(what)),
                "{mac} {what}: {dump}"
            );
        }
    }
}

/// Whether QEMU can be run; under `NYX_REQUIRE_KVM=1` (CI) it must.
fn qemu_available() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("NYX_REQUIRE_KVM").as_deref() != Ok("1"),
            "NYX_REQUIRE_KVM=1 but qemu-system-x86_64 cannot be run: install qemu-system-x86"
        );
        eprintln!("skipped: no qemu-system-x86_64");
    }
    ok
}

#[test]
fn a_nyx_guest_and_a_qemu_guest_exchange_frames_and_the_recording_replays_without_a_network() {
    if !kvm_available() || !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let trace = dir.path().join("net.nyxtrace");
    let nyx_side = netping(&["record", "--out", trace.to_str().unwrap()], &sock, ",server")
        .spawn()
        .unwrap();
    wait_for(&sock);
    let serial = dir.path().join("qemu.out");
    let qemu = Command::new("timeout")
        .args([
            "60",
            "qemu-system-x86_64",
            "-machine",
            "pc",
            "-cpu",
            "qemu64",
            "-m",
            "64",
        ])
        .args([
            "-display",
            "none",
            "-vga",
            "none",
            "-nic",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel"])
        .arg(guest("netping"))
        .args(["-append", nyx_guests::GOLDEN_APPEND, "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-netdev")
        .arg(format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            sock.display()
        ))
        .args([
            "-device",
            "virtio-net-pci,disable-legacy=on,addr=0x3,netdev=n0,mac=52:54:00:12:34:57",
        ])
        .output()
        .unwrap();
    let recorded = nyx_side.wait_with_output().unwrap();
    assert_eq!(
        qemu.status.code(),
        Some((nyx_guests::NETPING_EXIT as i32) << 1 | 1),
        "{}",
        text(&qemu.stderr)
    );
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), nyx_guests::NETPING_B_OUTPUT);
    let exit = Some(nyx_guests::NETPING_EXIT as i32);
    assert_eq!(recorded.status.code(), exit, "{}", text(&recorded.stderr));
    assert_eq!(text(&recorded.stdout), nyx_guests::NETPING_A_OUTPUT);
    let info = nyx().args(["trace", "info"]).arg(&trace).output().unwrap();
    assert!(text(&info.stdout).contains("net-input"), "{}", text(&info.stdout));
    // The socket is gone: a replay that tried to open it would fail.
    std::fs::remove_file(&sock).ok();
    for i in 0..3 {
        let r = nyx().arg("replay").arg(&trace).output().unwrap();
        assert_eq!(r.status.code(), exit, "replay {i}: {}", text(&r.stderr));
        assert_eq!(r.stdout, recorded.stdout, "replay {i}");
    }
}
