//! Cross-thread wakeups for ublk queue threads.
//!
//! A queue thread sleeps in `io_uring_enter` until its ring has a completion (or the idle
//! timeout, 20 s). A request task parked on something another thread releases (a raid stripe
//! lock, the parity log's lock, a thin pool lock held by the other queue) is woken through its
//! waker, which only queues it on the thread's executor: the thread itself stays asleep until
//! some unrelated completion arrives. Under load one usually does; when every request on the
//! thread waits on the other thread, none does, and the queue stalls.
//!
//! [`Kicked`] wraps each request task so that a wake from another thread also writes to an
//! eventfd the queue ring polls, which ends the sleep.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

thread_local! {
    /// Its address tells threads apart, for the price of a TLS access (no `Arc` traffic, as
    /// `std::thread::current()` would cost on every wake).
    static MARK: u8 = const { 0 };
}

fn thread_mark() -> usize {
    MARK.with(|m| m as *const u8 as usize)
}

/// One queue thread's eventfd.
pub(crate) struct Kick {
    efd: OwnedFd,
    owner: usize,
}

impl Kick {
    /// An eventfd owned by the calling (queue) thread.
    pub(crate) fn new() -> std::io::Result<Arc<Kick>> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Kick {
            // SAFETY: `fd` is a new descriptor nobody else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            owner: thread_mark(),
        }))
    }

    /// The descriptor the queue ring polls.
    pub(crate) fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. A full counter (EAGAIN)
        // still leaves it readable, which is all a kick needs.
        unsafe {
            libc::write(self.fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Resets the counter after the poll fired.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN (nothing pending) is fine.
        unsafe {
            libc::read(self.fd(), (&mut v as *mut u64).cast(), 8);
        }
    }

    /// Serves kicks on the queue thread: each one only ends the ring's wait, which lets the
    /// executor run what was woken. Runs until the ring refuses the poll (queue torn down).
    pub(crate) async fn serve(self: Arc<Self>) {
        while iort::readable(self.fd()).await.is_ok() {
            self.drain();
        }
    }
}

struct KickWaker {
    inner: Waker,
    kick: Arc<Kick>,
}

impl Wake for KickWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.inner.wake_by_ref();
        if thread_mark() != self.kick.owner {
            self.kick.ring();
        }
    }
}

/// A future whose wakers, fired from another thread, kick its queue thread awake.
pub(crate) struct Kicked<F> {
    fut: Pin<Box<F>>,
    kick: Arc<Kick>,
    /// The executor's waker this was built from, and the wrapped one.
    cached: Option<(Waker, Waker)>,
}

impl<F: Future> Kicked<F> {
    pub(crate) fn new(fut: F, kick: Arc<Kick>) -> Kicked<F> {
        Kicked {
            fut: Box::pin(fut),
            kick,
            cached: None,
        }
    }
}

impl<F: Future> Future for Kicked<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let fresh = match &this.cached {
            Some((inner, _)) => !inner.will_wake(cx.waker()),
            None => true,
        };
        if fresh {
            let w = Waker::from(Arc::new(KickWaker {
                inner: cx.waker().clone(),
                kick: this.kick.clone(),
            }));
            this.cached = Some((cx.waker().clone(), w));
        }
        let Some((_, w)) = &this.cached else {
            return Poll::Pending; // not reached: set just above
        };
        this.fut.as_mut().poll(&mut Context::from_waker(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_from_another_thread_makes_the_eventfd_readable() {
        let kick = Kick::new().unwrap();
        let woke = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let waker = Waker::from(Arc::new(Flag(woke.clone())));
        let slot: Arc<std::sync::Mutex<Option<Waker>>> = Arc::default();
        let s2 = slot.clone();
        let mut fut = Kicked::new(
            std::future::poll_fn(move |cx| {
                *s2.lock().unwrap() = Some(cx.waker().clone());
                Poll::<()>::Pending
            }),
            kick.clone(),
        );
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        let w = slot.lock().unwrap().take().unwrap();
        // Same thread: the executor's waker only.
        w.wake_by_ref();
        assert!(woke.load(std::sync::atomic::Ordering::SeqCst));
        let mut v = 0u64;
        // SAFETY: reads at most 8 bytes into `v`, a u64 of ours.
        let n = unsafe { libc::read(kick.fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!(n, -1, "no kick for a same-thread wake");
        // Another thread: the eventfd fires too.
        std::thread::spawn(move || w.wake()).join().unwrap();
        // SAFETY: as above.
        let n = unsafe { libc::read(kick.fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 1));
    }
}
