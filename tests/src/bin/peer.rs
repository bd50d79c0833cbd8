//! A TCP peer the integration tests run as a separate process, so that events can
//! be checked for the right pid and command name.
//!
//! peer NAME listen ADDR:PORT   [SERVE]   bind, print the port, serve one connection
//! peer NAME accept FD          [SERVE]   serve one connection from inherited listener FD
//! peer NAME connect ADDR:PORT  SEND RECV IDLE_MS
//!                                        send SEND bytes, read RECV bytes, stay idle
//!                                        IDLE_MS, close
//! peer NAME hold ADDR:PORT SECONDS   connect, read until the server closes, then keep
//!                                        the socket open SECONDS without closing it
//! SERVE: EXPECT REPLY — read EXPECT bytes, write REPLY bytes, wait for the peer to
//! close, close.
//!
//! NAME becomes the process's command name (what the kernel reports as comm).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::FromRawFd,
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, command, rest @ ..] = args.as_slice() else {
        bail!("usage: peer NAME listen|accept|connect ...");
    };
    nix::sys::prctl::set_name(&std::ffi::CString::new(name.as_str())?)?;
    let number = |i: usize| -> anyhow::Result<u64> {
        rest.get(i)
            .with_context(|| format!("missing argument {i}"))?
            .parse()
            .with_context(|| format!("argument {i} is not a number"))
    };
    match command.as_str() {
        "listen" => {
            let listener = TcpListener::bind(rest.first().context("missing ADDR:PORT")?)?;
            println!("{}", listener.local_addr()?.port());
            std::io::stdout().flush()?;
            serve(&listener, number(1)? as usize, number(2)? as usize)
        }
        "accept" => {
            // SAFETY: the parent passed this descriptor for us to own.
            let listener = unsafe { TcpListener::from_raw_fd(number(0)? as i32) };
            serve(&listener, number(1)? as usize, number(2)? as usize)
        }
        "connect" => {
            let mut stream = TcpStream::connect(rest.first().context("missing ADDR:PORT")?)?;
            stream.write_all(&vec![b'q'; number(1)? as usize])?;
            stream.read_exact(&mut vec![0; number(2)? as usize])?;
            thread::sleep(Duration::from_millis(number(3)?));
            drop(stream);
            Ok(())
        }
        "hold" => {
            let mut stream = TcpStream::connect(rest.first().context("missing ADDR:PORT")?)?;
            let mut received = Vec::new();
            stream.read_to_end(&mut received)?;
            println!("eof");
            std::io::stdout().flush()?;
            // The bug being imitated: the peer closed, this process never does.
            thread::sleep(Duration::from_secs(number(1)?));
            drop(stream);
            Ok(())
        }
        other => bail!("unknown command {other}"),
    }
}

fn serve(listener: &TcpListener, expect: usize, reply: usize) -> anyhow::Result<()> {
    let (mut stream, _) = listener.accept()?;
    stream.read_exact(&mut vec![0; expect])?;
    stream.write_all(&vec![b'r'; reply])?;
    // Wait for the client's FIN.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    Ok(())
}
