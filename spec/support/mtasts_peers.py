# Peers for the MTA-STS specs, in one process: an HTTPS server publishing policies, aiosmtpd MX
# hosts offering STARTTLS with the certificates they are given, and a man in the middle that
# removes STARTTLS from the EHLO reply of the MX host behind it. Prints "ready" once all listen;
# then one line per event: "GET <host>" per policy request, and a JSON line per message received.
# usage: mtasts_peers.py CONFIG.json   (see spec/support/mtasts_bed.lua for its fields)
import asyncio, json, os, ssl, sys, threading
from aiosmtpd.controller import Controller

cfg = json.load(open(sys.argv[1]))
out_lock = threading.Lock()


def say(line):
    with out_lock:
        print(line, flush=True)


def server_ctx(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


class Handler:
    def __init__(self, name):
        self.name = name

    async def handle_DATA(self, server, session, envelope):
        say(json.dumps({"mx": self.name, "from": envelope.mail_from, "to": envelope.rcpt_tos,
                        "tls": session.ssl is not None}))
        return "250 2.0.0 queued"


# The policy directory holds one file per host name (mta-sts.<domain>); a host whose file is
# missing answers 404. Behaviours picked by the domain's first label:
#   redirect -> 301 to another host; big -> a 100 KB policy; html -> Content-Type text/html;
#   chunked -> the file sent with chunked transfer coding; slow -> never answers.
async def https_client(reader, writer):
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except Exception:
        writer.close()
        return
    host = ""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if line.lower().startswith("host:"):
            host = line[5:].strip().lower()
    path = head.split(b" ")[1].decode("latin-1") if b" " in head else ""
    say("GET %s %s" % (host, path))
    label = host.split(".")[1] if host.count(".") >= 2 else ""
    body = None
    fn = os.path.join(cfg["policies"], host)
    if os.path.exists(fn):
        body = open(fn, "rb").read()
    ctype = b"text/plain; charset=utf-8"
    if label == "slow":
        await asyncio.sleep(30)
        writer.close()
        return
    if label == "redirect":
        resp = (b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://mta-sts.enf.test/.well-known/mta-sts.txt\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    elif body is None or path != "/.well-known/mta-sts.txt":
        resp = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    else:
        if label == "big":
            body = body + b"x-pad: " + b"x" * 100000 + b"\n"
        if label == "html":
            ctype = b"text/html"
        if label == "chunked":
            mid = len(body) // 2
            parts = [body[:mid], body[mid:]]
            enc = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
            resp = (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n" + enc)
        else:
            resp = (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n" % len(body)) + body
    writer.write(resp)
    try:
        await writer.drain()
    except Exception:
        pass
    writer.close()


# The stripping man in the middle: bytes from the MX host have STARTTLS overwritten.
def stripper(target_ip, port):
    async def client(creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection(target_ip, port)
        except Exception:
            cwriter.close()
            return

        async def pipe(r, w, strip):
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    if strip:
                        data = data.replace(b"STARTTLS", b"XXXXXXXX")
                    w.write(data)
                    await w.drain()
            except Exception:
                pass
            w.close()

        await asyncio.gather(pipe(creader, swriter, False), pipe(sreader, cwriter, True))
    return client


async def main():
    port = cfg["port"]
    ctrls = []
    for mx in cfg["mx"]:
        c = Controller(Handler(mx["name"]), hostname=mx["ip"], port=port, ready_timeout=10,
                       tls_context=server_ctx(mx["cert"], mx["key"]), server_hostname=mx["name"])
        c.start()
        ctrls.append(c)
    servers = []
    for st in cfg.get("strip", []):
        servers.append(await asyncio.start_server(stripper(st["to"], port), st["ip"], port))
    web = cfg["web"]
    servers.append(await asyncio.start_server(https_client, web["ip"], web["port"],
                                              ssl=server_ctx(web["cert"], web["key"])))
    say("ready")
    await asyncio.gather(*(s.serve_forever() for s in servers))

asyncio.run(main())
