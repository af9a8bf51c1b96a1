//! The VM's control thread: device activations and guest-driven resets run
//! here rather than on the vCPU thread whose register write asked for them.
//!
//! Activating a device starts its worker thread, and a new thread inherits
//! the seccomp filter of the thread that creates it: a worker started by a
//! vCPU could only make the syscalls both the vCPU's and its own filter
//! allow. Running activation here also keeps what it needs (opening the
//! share's root, creating eventfds and epoll sets, thread creation, tap
//! ioctls) out of the vCPU's allow-list. The vCPU waits for the answer, as
//! it waited for the activation before.
//!
//! The thread has no filter of its own (the process-wide deny list, where
//! installed, applies): it runs only jobs the VMM's transports hand it.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

enum Message {
    Run(Job),
    Stop,
}

/// The control thread; dropping it stops and joins the thread (a handle
/// used afterwards runs its jobs on the caller).
#[derive(Debug)]
pub struct ControlThread {
    handle: ControlHandle,
    thread: Option<JoinHandle<()>>,
}

impl ControlThread {
    /// Starts the control thread (`husk-control`). Call it from a thread
    /// without a VMM filter: the thread, and every worker it starts,
    /// inherits the caller's filter.
    pub fn start() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Message>();
        let thread = std::thread::Builder::new()
            .name("husk-control".into())
            .spawn(move || {
                for message in rx {
                    match message {
                        Message::Run(job) => job(),
                        Message::Stop => return,
                    }
                }
            })?;
        Ok(Self {
            handle: ControlHandle(tx),
            thread: Some(thread),
        })
    }

    /// Where the VM's transports send their activations and resets.
    pub fn handle(&self) -> ControlHandle {
        self.handle.clone()
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        let _ = self.handle.0.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the device control thread panicked");
            }
        }
    }
}

/// Sends jobs to the control thread.
#[derive(Clone, Debug)]
pub struct ControlHandle(mpsc::Sender<Message>);

impl ControlHandle {
    /// Runs `f` on `value` on the control thread, waits, and gives both
    /// back. If the thread is gone the job runs on the caller. `None` only
    /// if `f` panicked (the value is lost with it).
    pub fn run<T, R>(
        &self,
        value: T,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> Option<(T, R)>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let mut value = value;
            let result = f(&mut value);
            let _ = done_tx.send((value, result));
        });
        if let Err(mpsc::SendError(Message::Run(job))) = self.0.send(Message::Run(job)) {
            job();
        }
        done_rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_control_thread_and_give_their_value_back() {
        let control = ControlThread::start().unwrap();
        let handle = control.handle();
        let (value, name) = handle
            .run(41, |v| {
                *v += 1;
                std::thread::current().name().map(str::to_owned)
            })
            .unwrap();
        assert_eq!(value, 42);
        assert_eq!(name.as_deref(), Some("husk-control"));
        // Once the thread is gone, jobs run on the caller.
        drop(control);
        let (_, name) = handle
            .run((), |()| std::thread::current().name().map(str::to_owned))
            .unwrap();
        assert_ne!(name.as_deref(), Some("husk-control"));
    }
}
