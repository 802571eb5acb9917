# aiosmtpd peer for the OpenResty specs: STARTTLS with the test certificate, stores each message's
# raw bytes (as received, unstuffed, CRLF) in DIR/N.eml with its envelope in DIR/N.env and the
# client's address in DIR/N.peer, counts
# TCP connections in DIR/connections, and can delay its greeting to play a slow server.
# usage: openresty_smtpd.py HOST PORT DIR [--cert F --key F] [--greeting-delay S] [--require-tls]
#        [--implicit] [--rset-status LINE]
import argparse, asyncio, os, ssl, sys, time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

ap = argparse.ArgumentParser()
ap.add_argument("host"); ap.add_argument("port", type=int); ap.add_argument("dir")
ap.add_argument("--cert"); ap.add_argument("--key")
ap.add_argument("--greeting-delay", type=float, default=0.0)
ap.add_argument("--require-tls", action="store_true")
ap.add_argument("--rset-status", help="answer RSET with this line (a server that went away)")
ap.add_argument("--implicit", action="store_true", help="TLS from the first byte (port 465 style)")
a = ap.parse_args()

state = {"connections": 0, "messages": 0, "rsets": 0}


def bump(name):
    state[name] += 1
    tmp = os.path.join(a.dir, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(state[name]))
    os.replace(tmp, os.path.join(a.dir, name))


class Recorder:
    async def handle_DATA(self, server, session, envelope):
        n = state["messages"] + 1
        with open(os.path.join(a.dir, "%d.eml" % n), "wb") as f:
            f.write(envelope.original_content)
        with open(os.path.join(a.dir, "%d.env" % n), "w") as f:
            f.write(envelope.mail_from + "\n" + "\n".join(envelope.rcpt_tos) + "\n")
        with open(os.path.join(a.dir, "%d.peer" % n), "w") as f:
            f.write(session.peer[0])
        bump("messages")
        return "250 2.0.0 stored %d" % n

    async def handle_RSET(self, server, session, envelope):
        if a.rset_status:
            bump("rsets")
            return a.rset_status
        return "250 OK"


class CountingSMTP(SMTP):
    def connection_made(self, transport):
        # aiosmtpd calls this again with the TLS transport after STARTTLS: count TCP only.
        if transport.get_extra_info("sslcontext") is None:
            bump("connections")
        super().connection_made(transport)

    async def _handle_client(self):
        if a.greeting_delay:
            await asyncio.sleep(a.greeting_delay)
        await super()._handle_client()


class C(Controller):
    def factory(self):
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


kw = {"server_hostname": "smtpd.test", "ident": "openresty-spec"}
if a.cert:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)
    kw["tls_context"] = ctx
    kw["require_starttls"] = a.require_tls

ckw = {}
if a.implicit:
    ckw["ssl_context"] = kw.pop("tls_context")
    kw.pop("require_starttls", None)
ctl = C(Recorder(), hostname=a.host, port=a.port, ready_timeout=10, **ckw, **kw)
ctl.start()
print("ready", flush=True)
try:
    while True:
        time.sleep(3600)
except KeyboardInterrupt:
    pass
finally:
    ctl.stop()
