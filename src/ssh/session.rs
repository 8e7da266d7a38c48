//! Authenticated SSH sessions to machines, only ever to a host whose key
//! matches the pinned one: the key check happens during key exchange,
//! before the operator authenticates or sends anything.
//!
//! Commands run as root: directly when the login user is root, otherwise
//! through `sudo -n`, which the session checks once, before the first
//! command, so a user without passwordless sudo is named as such instead of
//! surfacing as a failed store or activation command.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::ChannelMsg;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

use super::{HostKey, SshError, client_config, format_addr};
use crate::nix::activation::shell_quote;

/// AES-GCM first: with the AES instructions every server CPU has, it costs
/// a fraction of ChaCha20-Poly1305 (russh's first choice) on both ends of a
/// push of hundreds of MiB.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_128_CTR,
];

/// Accepts the server only if it proves the pinned key.
struct PinnedHost {
    pinned: HostKey,
    presented: Arc<Mutex<Option<PublicKey>>>,
}

impl russh::client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let key = key.public_key();
        let ok = key.key_data() == self.pinned.public_key().key_data();
        if let Ok(mut presented) = self.presented.lock() {
            *presented = Some(key);
        }
        Ok(ok)
    }
}

/// What a remote command returned.
#[derive(Debug, Default)]
pub struct CommandOutput {
    /// Exit status; None if the server sent none (e.g. killed by a signal).
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// An authenticated connection to one machine.
pub struct Session {
    handle: russh::client::Handle<PinnedHost>,
    addr: String,
    /// The login user; commands are wrapped in `sudo -n` unless it is root.
    user: String,
    /// Whether `sudo -n` works for a non-root user: None if it does, else
    /// why not. Checked at the first command, so a session only used as a
    /// jump host never needs sudo.
    sudo_refused: tokio::sync::OnceCell<Option<String>>,
    /// The jump host session this one is tunnelled through, kept open.
    _via: Option<Arc<Session>>,
}

/// Runs the SSH handshake with `handler`, directly or through a jump host.
pub(super) async fn connect_handler<H>(
    config: Arc<russh::client::Config>,
    host: &str,
    port: u16,
    handler: H,
    via: Option<&Session>,
) -> Result<russh::client::Handle<H>, russh::Error>
where
    H: russh::client::Handler<Error = russh::Error> + Send + 'static,
{
    match via {
        None => russh::client::connect(config, (host, port), handler).await,
        Some(jump) => {
            let stream =
                jump.forward(host, port).await.map_err(|e| russh::Error::IO(std::io::Error::other(e.to_string())))?;
            russh::client::connect_stream(config, stream, handler).await
        }
    }
}

impl Session {
    /// Connects to `host:port` (through `via`, a session to a jump host,
    /// if given), checks the host key against `pinned`, and logs in as
    /// `user` with `key`.
    pub async fn connect(
        host: &str,
        port: u16,
        user: &str,
        key: &PrivateKey,
        pinned: &HostKey,
        timeout: Duration,
        via: Option<Arc<Session>>,
    ) -> Result<Self, SshError> {
        let addr = format_addr(host, port);
        let presented = Arc::new(Mutex::new(None));
        let handler = PinnedHost { pinned: pinned.clone(), presented: presented.clone() };
        let mut config = client_config(Some(pinned), timeout.max(Duration::from_secs(60)));
        config.keepalive_interval = Some(Duration::from_secs(15));
        config.keepalive_max = 4;
        config.preferred.cipher = Cow::Borrowed(CIPHERS);
        let config = Arc::new(config);
        let connecting = connect_handler(config, host, port, handler, via.as_deref());
        let mut handle = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => return Err(SshError::Timeout { addr, seconds: timeout.as_secs() }),
            Ok(Ok(handle)) => handle,
            Ok(Err(err)) => {
                let seen = presented.lock().ok().and_then(|mut k| k.take()).map(HostKey);
                return Err(match seen {
                    Some(seen) if &seen != pinned => {
                        SshError::HostKeyMismatch { addr, presented: seen.to_string(), pinned: pinned.to_string() }
                    }
                    _ => SshError::Connect { addr, reason: err.to_string() },
                });
            }
        };
        // Only an RSA key needs the server's signature algorithms, and
        // asking can wait for a message that may come a round trip later.
        let hash = if key.algorithm().is_rsa() {
            handle.best_supported_rsa_hash().await.ok().flatten().flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key.clone()), hash))
            .await
            .map_err(|e| SshError::Connect { addr: addr.clone(), reason: e.to_string() })?;
        if !auth.success() {
            return Err(SshError::AuthRejected { addr, user: user.to_owned() });
        }
        Ok(Self { handle, addr, user: user.to_owned(), sudo_refused: tokio::sync::OnceCell::new(), _via: via })
    }

    /// Opens a TCP connection to `host:port` from this host (`ssh -J`).
    pub async fn forward(&self, host: &str, port: u16) -> Result<russh::ChannelStream<russh::client::Msg>, SshError> {
        let channel =
            self.handle.channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0).await.map_err(|e| {
                SshError::Connect {
                    addr: format_addr(host, port),
                    reason: format!("the jump host {} could not connect: {e}", self.addr),
                }
            })?;
        Ok(channel.into_stream())
    }

    /// Opens a connection to the Unix socket at `path` on this host
    /// (`ssh -L local:path`), e.g. libvirtd's.
    pub async fn forward_unix(&self, path: &str) -> Result<russh::ChannelStream<russh::client::Msg>, SshError> {
        let channel = self.handle.channel_open_direct_streamlocal(path).await.map_err(|e| SshError::Connect {
            addr: self.addr.clone(),
            reason: format!(
                "cannot reach the socket {path} there (is it the right path, and may the login user use it?): {e}"
            ),
        })?;
        Ok(channel.into_stream())
    }

    /// `command` as it must be sent to run as root: unchanged for root,
    /// else under `sudo -n` (never prompting), once sudo is known to work.
    /// Standard input and output pass through sudo untouched.
    async fn as_root<'c>(&self, command: &'c str) -> Result<Cow<'c, str>, SshError> {
        if self.user == "root" {
            return Ok(Cow::Borrowed(command));
        }
        let refused = self.sudo_refused.get_or_try_init(|| self.check_sudo()).await?;
        if let Some(reason) = refused {
            return Err(SshError::SudoRefused {
                addr: self.addr.clone(),
                user: self.user.clone(),
                reason: reason.clone(),
            });
        }
        Ok(Cow::Owned(format!("sudo -n sh -c {}", shell_quote(command))))
    }

    /// Whether the login user may run commands as root without a password:
    /// None if so, else what sudo (or the shell, without sudo) said.
    async fn check_sudo(&self) -> Result<Option<String>, SshError> {
        let out = self.run("sudo -n true").await?;
        if out.status == Some(0) {
            return Ok(None);
        }
        let said = String::from_utf8_lossy(&out.stderr).trim().replace('\n', " | ");
        Ok(Some(match (said.is_empty(), out.status) {
            (false, _) => said,
            (true, Some(status)) => format!("exit status {status}"),
            (true, None) => "killed by a signal".into(),
        }))
    }

    /// Runs `command` as root and collects its output and exit status.
    pub async fn exec(&self, command: &str) -> Result<CommandOutput, SshError> {
        let command = self.as_root(command).await?;
        self.run(&command).await
    }

    /// Runs `command` as the login user and collects its output and exit status.
    async fn run(&self, command: &str) -> Result<CommandOutput, SshError> {
        let failed = |e: russh::Error| SshError::Connect { addr: self.addr.clone(), reason: e.to_string() };
        let mut channel = self.handle.channel_open_session().await.map_err(failed)?;
        channel.exec(true, command).await.map_err(failed)?;
        let mut received = Received::default();
        while !received.closed {
            let msg = channel.wait().await;
            received.take(msg);
        }
        received.ended(&self.addr)?;
        let mut out = received.out;
        out.stdout = received.stdout;
        Ok(out)
    }

    /// Runs `command` as root with `input` as its standard input.
    pub async fn exec_with_input(&self, command: &str, input: &[u8]) -> Result<CommandOutput, SshError> {
        let mut process = self.spawn(command).await?;
        process.send(input.to_vec()).await?;
        process.finish().await
    }

    /// Starts `command` as root and returns it running, for a conversation
    /// over its standard input and output.
    pub async fn spawn(&self, command: &str) -> Result<RemoteProcess, SshError> {
        let command = self.as_root(command).await?;
        let failed = |e: russh::Error| SshError::Connect { addr: self.addr.clone(), reason: e.to_string() };
        let channel = self.handle.channel_open_session().await.map_err(failed)?;
        // No reply wanted: input can follow at once instead of a round trip
        // later; a command that cannot start shows in its exit status.
        channel.exec(false, command.as_ref()).await.map_err(failed)?;
        let (reader, writer) = channel.split();
        Ok(RemoteProcess { reader, writer, addr: self.addr.clone(), received: Received::default(), read: 0 })
    }

    /// Whether the connection is gone (closed by either side, or found dead
    /// by keepalives).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// The address this session is connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Cuts the connection; commands running over it see it die.
    pub async fn disconnect(&self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
}

/// A command running on the remote host.
pub struct RemoteProcess {
    reader: russh::ChannelReadHalf,
    writer: russh::ChannelWriteHalf<russh::client::Msg>,
    addr: String,
    /// Output received so far; standard output not yet consumed by `read_exact`.
    received: Received,
    read: usize,
}

/// What a remote command has sent so far.
#[derive(Default)]
struct Received {
    stdout: Vec<u8>,
    out: CommandOutput,
    /// The signal that ended the command, if one did.
    signal: Option<String>,
    closed: bool,
}

impl Received {
    fn take(&mut self, msg: Option<ChannelMsg>) {
        match msg {
            Some(ChannelMsg::Data { data }) => self.stdout.extend_from_slice(&data),
            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => self.out.stderr.extend_from_slice(&data),
            Some(ChannelMsg::ExitStatus { exit_status }) => self.out.status = Some(exit_status),
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => self.signal = Some(format!("{signal_name:?}")),
            Some(_) => {}
            None => self.closed = true,
        }
    }

    /// A channel that closed with neither an exit status nor a signal was
    /// cut (the connection died): the command's outcome is unknown, which
    /// is not the same as a failed command.
    fn ended(&self, addr: &str) -> Result<(), SshError> {
        if self.out.status.is_none() && self.signal.is_none() {
            return Err(SshError::Lost {
                addr: addr.to_owned(),
                reason: "the connection closed before the command reported how it ended".into(),
            });
        }
        Ok(())
    }
}

impl RemoteProcess {
    fn lost(&self, what: &str) -> SshError {
        SshError::Connect { addr: self.addr.clone(), reason: what.to_owned() }
    }

    /// Sends bytes to the command's standard input (waits for the SSH
    /// window), taking in its output meanwhile: a command that answers while
    /// it reads must not stall the connection with unread answers.
    pub async fn send(&mut self, data: impl Into<bytes::Bytes>) -> Result<(), SshError> {
        let sending = self.writer.data_bytes(data);
        tokio::pin!(sending);
        loop {
            tokio::select! {
                sent = &mut sending => {
                    return sent.map_err(|e| SshError::Connect { addr: self.addr.clone(), reason: format!("sending: {e}") });
                }
                msg = self.reader.wait(), if !self.received.closed => self.received.take(msg),
            }
        }
    }

    /// Reads exactly `n` bytes of standard output.
    pub async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, SshError> {
        while self.received.stdout.len() - self.read < n {
            if self.received.closed {
                let stderr = String::from_utf8_lossy(&self.received.out.stderr).trim().to_owned();
                return Err(self.lost(&format!("the remote command ended early: {stderr}")));
            }
            let msg = self.reader.wait().await;
            self.received.take(msg);
        }
        let bytes = self.received.stdout[self.read..self.read + n].to_vec();
        self.read += n;
        if self.read > 1 << 20 {
            self.received.stdout.drain(..self.read);
            self.read = 0;
        }
        Ok(bytes)
    }

    /// How the command ended, once it has: its exit status and what it
    /// wrote to standard error. None while it runs, or if the connection
    /// was cut (then how it ended is unknown).
    pub fn ended(&self) -> Option<&CommandOutput> {
        (self.received.closed && self.received.out.status.is_some()).then_some(&self.received.out)
    }

    /// Waits until the command has ended (or the connection is gone),
    /// taking in what it still says.
    pub async fn wait_ended(&mut self) {
        while !self.received.closed {
            let msg = self.reader.wait().await;
            self.received.take(msg);
        }
    }

    /// Closes standard input and leaves the command to end by itself,
    /// without waiting for it (a round trip) or for what it still says.
    pub async fn close_input(self) {
        let _ = self.writer.eof().await;
    }

    /// Closes standard input, waits for the command to end and returns the
    /// output not yet read and the exit status.
    pub async fn finish(mut self) -> Result<CommandOutput, SshError> {
        self.writer.eof().await.map_err(|e| self.lost(&format!("closing input: {e}")))?;
        self.wait_ended().await;
        self.received.ended(&self.addr)?;
        let mut out = std::mem::take(&mut self.received.out);
        out.stdout = self.received.stdout.split_off(self.read);
        Ok(out)
    }
}
