//! Termination signals and daemonizing.
//!
//! SIGINT and SIGTERM are blocked in every thread (call [`block_termination_signals`] before
//! any thread starts, so threads inherit the mask) and taken synchronously by one thread with
//! [`wait_termination_signal`]: the shutdown path then runs as ordinary code (flush, stop the
//! front ends, delete devices), never inside a signal handler.

use std::io;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialize the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and threads it starts afterwards).
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: set is initialized; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM and returns its name.
pub fn wait_termination_signal() -> &'static str {
    let set = termination_set();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: set is initialized and blocked; sig is a valid out pointer.
        let r = unsafe { libc::sigwait(&set, &mut sig) };
        if r == 0 {
            return match sig {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                _ => "signal",
            };
        }
    }
}

/// Detaches from the terminal: fork (parent exits 0), setsid, stdin from /dev/null. Must run
/// before any thread is started.
pub fn detach() -> io::Result<()> {
    // SAFETY: single-threaded at this point (documented precondition); fork/setsid/dup2 on
    // descriptors we own.
    unsafe {
        match libc::fork() {
            -1 => return Err(io::Error::last_os_error()),
            0 => {}
            _ => libc::_exit(0),
        }
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            libc::dup2(fd, 0);
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
    Ok(())
}
