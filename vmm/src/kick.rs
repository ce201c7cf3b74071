//! Kicking the vCPU out of `KVM_RUN`.
//!
//! A guest that computes without exiting would never let a device deadline
//! (the next timer tick) be served. The vCPU thread owns a POSIX timer that
//! sends it a real-time signal at the deadline; the signal handler sets
//! `kvm_run.immediate_exit`, so that a signal that arrives just before
//! `KVM_RUN` is entered is not lost, and `KVM_RUN` returns `EINTR`. Other
//! threads (gdb's Ctrl-C, the control socket) kick through a [`Kicker`].

use std::cell::{Cell, RefCell};
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use kvm_bindings::kvm_run;

thread_local! {
    /// The `kvm_run` of the vCPU driven by this thread, for the signal handler.
    static RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// The kick targets naming this thread: cleared when the thread exits.
    static TARGETS: RefCell<ThreadTargets> = const { RefCell::new(ThreadTargets(Vec::new())) };
}

/// Where a [`Kicker`] sends its signal: the vCPU thread while its
/// [`VcpuTimer`] lives and the thread runs, `None` after. Kicks send the
/// signal with the lock held, and the thread's exit takes the lock to clear
/// it, so a signal never goes to a thread id that no longer exists.
type Target = Arc<Mutex<Option<libc::pthread_t>>>;

fn clear(target: &Mutex<Option<libc::pthread_t>>) {
    *target.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The targets of the timers created on one thread.
struct ThreadTargets(Vec<Weak<Mutex<Option<libc::pthread_t>>>>);

impl Drop for ThreadTargets {
    fn drop(&mut self) {
        for t in self.0.drain(..).filter_map(|w| w.upgrade()) {
            clear(&t);
        }
    }
}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only touches a thread-local raw pointer: async-signal-safe.
    let _ = RUN.try_with(|r| {
        let p = r.get();
        if !p.is_null() {
            // SAFETY: the pointer is the mmap'd kvm_run of this thread's vCPU,
            // registered by `VcpuTimer::new` and cleared on drop.
            unsafe { (*p).immediate_exit = 1 };
        }
    });
}

fn install_handler() -> io::Result<()> {
    // SAFETY: a plain sigaction with a handler that is async-signal-safe;
    // no SA_RESTART so that KVM_RUN returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A handle other threads use to interrupt the vCPU thread. It may outlive
/// the timer and the thread: a kick then only marks the request.
#[derive(Clone, Debug)]
pub struct Kicker {
    target: Target,
    requested: Arc<AtomicBool>,
}

impl Kicker {
    /// Interrupts the vCPU; [`VcpuTimer::take_request`] then reports it.
    /// Returns whether a signal was sent (false once the vCPU's timer is
    /// dropped or its thread has ended).
    pub fn kick(&self) -> bool {
        self.requested.store(true, Ordering::SeqCst);
        self.nudge()
    }

    /// Interrupts the vCPU without asking it to stop: `KVM_RUN` returns
    /// `EINTR` (at once if the thread is not in the guest now), so that the
    /// thread looks again at what is pending for its vCPU (an interrupt
    /// another vCPU sent). Returns whether a signal was sent.
    pub fn nudge(&self) -> bool {
        let target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        match *target {
            // SAFETY: the id is of a live thread: it is cleared, under this
            // lock, when the timer is dropped and when the thread exits.
            Some(thread) => unsafe { libc::pthread_kill(thread, kick_signal()) == 0 },
            None => false,
        }
    }
}

/// The per-vCPU-thread deadline timer. It stays on the thread that created
/// it (it is not `Send`): its signal handler and `kvm_run` pointer belong
/// to that thread.
pub struct VcpuTimer {
    timer: libc::timer_t,
    armed: Option<u64>,
    requested: Arc<AtomicBool>,
    target: Target,
    _not_send: PhantomData<*mut kvm_run>,
}

impl std::fmt::Debug for VcpuTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuTimer").field("armed", &self.armed).finish()
    }
}

impl VcpuTimer {
    /// Creates the timer for the calling thread, which drives the vCPU whose
    /// `kvm_run` is `run`.
    ///
    /// # Safety
    ///
    /// `run` must point to a `kvm_run` that stays valid for writes (mapped)
    /// until the returned timer is dropped: the signal handler of this
    /// thread writes `immediate_exit` through it at any moment until then.
    pub unsafe fn new(run: *mut kvm_run) -> io::Result<Self> {
        install_handler()?;
        RUN.with(|r| r.set(run));
        // SAFETY: sigevent is plain data; timer_create writes the id.
        let timer = unsafe {
            let mut sev: libc::sigevent = std::mem::zeroed();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = kick_signal();
            sev.sigev_notify_thread_id = libc::gettid();
            let mut timer: libc::timer_t = std::mem::zeroed();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) != 0 {
                return Err(io::Error::last_os_error());
            }
            timer
        };
        // SAFETY: pthread_self has no preconditions.
        let target: Target = Arc::new(Mutex::new(Some(unsafe { libc::pthread_self() })));
        // A thread already tearing down its thread-locals keeps no record:
        // its timer's drop clears the target then.
        let _ = TARGETS.try_with(|t| {
            let mut t = t.borrow_mut();
            t.0.retain(|w| w.strong_count() > 0);
            t.0.push(Arc::downgrade(&target));
        });
        Ok(VcpuTimer {
            timer,
            armed: None,
            requested: Arc::new(AtomicBool::new(false)),
            target,
            _not_send: PhantomData,
        })
    }

    /// Points the signal handler at another vCPU's `kvm_run`: the thread
    /// now drives that vCPU (a machine running its vCPUs one at a time on
    /// one thread switched).
    ///
    /// # Safety
    ///
    /// As for [`VcpuTimer::new`]: `run` must stay valid for writes until
    /// the timer is dropped or retargeted again.
    pub unsafe fn retarget(&mut self, run: *mut kvm_run) {
        RUN.with(|r| r.set(run));
    }

    /// A handle for other threads.
    pub fn kicker(&self) -> Kicker {
        Kicker {
            target: self.target.clone(),
            requested: self.requested.clone(),
        }
    }

    /// Whether another thread asked for a stop since the last call.
    pub fn take_request(&self) -> bool {
        self.requested.swap(false, Ordering::SeqCst)
    }

    /// Arms the timer for the absolute `CLOCK_MONOTONIC` time `deadline_ns`
    /// (None disarms). After the first expiry it repeats every millisecond
    /// until re-armed, so that a kick can never be lost for long.
    pub fn arm(&mut self, deadline_ns: Option<u64>) -> io::Result<()> {
        if self.armed == deadline_ns {
            return Ok(());
        }
        let ts = |ns: u64| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        let spec = match deadline_ns {
            // A zero it_value disarms; use 1 ns for a deadline of 0.
            Some(d) => libc::itimerspec {
                it_value: ts(d.max(1)),
                it_interval: ts(1_000_000),
            },
            None => libc::itimerspec {
                it_value: ts(0),
                it_interval: ts(0),
            },
        };
        // SAFETY: valid timer id and itimerspec.
        if unsafe { libc::timer_settime(self.timer, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = deadline_ns;
        Ok(())
    }
}

impl Drop for VcpuTimer {
    fn drop(&mut self) {
        clear(&self.target);
        RUN.with(|r| r.set(std::ptr::null_mut()));
        // SAFETY: the timer was created by us.
        unsafe { libc::timer_delete(self.timer) };
    }
}

/// Host `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_sets_immediate_exit_of_this_thread() {
        std::thread::spawn(|| {
            let mut run: kvm_run = Default::default();
            // SAFETY: `run` outlives `t`, dropped below.
            let mut t = unsafe { VcpuTimer::new(&mut run) }.unwrap();
            t.arm(Some(monotonic_ns() + 2_000_000)).unwrap();
            let start = monotonic_ns();
            // SAFETY: reading a field of a live local.
            while unsafe { std::ptr::read_volatile(&run.immediate_exit) } == 0 {
                assert!(monotonic_ns() - start < 2_000_000_000, "timer never fired");
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            t.arm(None).unwrap();
            drop(t);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn kicker_marks_a_request() {
        std::thread::spawn(|| {
            let mut run: kvm_run = Default::default();
            // SAFETY: `run` outlives `t`.
            let t = unsafe { VcpuTimer::new(&mut run) }.unwrap();
            let k = t.kicker();
            assert!(k.kick());
            assert!(t.take_request());
            assert!(!t.take_request());
            // SAFETY: reading a field of a live local.
            assert_eq!(unsafe { std::ptr::read_volatile(&run.immediate_exit) }, 1);
        })
        .join()
        .unwrap();
    }

    /// A kicker kept after its timer was dropped, and after its thread
    /// ended, sends no signal (a stale thread id could name another thread
    /// or none) but still marks the request.
    #[test]
    fn a_kicker_outliving_its_timer_or_thread_sends_nothing() {
        let (after_drop, requested) = std::thread::spawn(|| {
            let mut run: kvm_run = Default::default();
            // SAFETY: `run` outlives `t`.
            let t = unsafe { VcpuTimer::new(&mut run) }.unwrap();
            let k = t.kicker();
            let requested = t.requested.clone();
            drop(t);
            (k, requested)
        })
        .join()
        .unwrap();
        assert!(!after_drop.kick());
        assert!(requested.load(Ordering::SeqCst));

        // The timer leaked: only the thread's end clears the target.
        let leaked = std::thread::spawn(|| {
            let run = Box::leak(Box::default());
            // SAFETY: `run` is leaked, valid for ever.
            let t = unsafe { VcpuTimer::new(run) }.unwrap();
            let k = t.kicker();
            std::mem::forget(t);
            k
        })
        .join()
        .unwrap();
        assert!(!leaked.kick());
    }
}
