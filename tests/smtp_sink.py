"""A loopback SMTP server for patchbook's notification tests.

Usage: smtp_sink.py OUTDIR [--starttls CERT KEY]

Saves every accepted message as OUTDIR/NNNN.json with its envelope sender and
recipients, its raw content and its decoded subject, From, To and body. It binds a
port of the kernel's choosing and prints "ready PORT" once it listens, so no port is
ever freed and then reused by the test. It stops when its
stdin closes, so it cannot outlive the test that started it.
"""

import asyncio
import email
import email.policy
import json
import os
import sys

from aiosmtpd.smtp import SMTP


class Sink:
    def __init__(self, outdir):
        self.outdir = outdir
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = os.path.join(self.outdir, "%04d.json" % self.count)
        # Parsed here, so the tests compare decoded text, not folded headers
        # and quoted-printable lines.
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        record = {
            "subject": str(msg["subject"]),
            "from": str(msg["from"]),
            "to": str(msg["to"]),
            "body": msg.get_content().replace("\r\n", "\n"),
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": envelope.content.decode("utf-8", "replace"),
            "tls": session.ssl is not None,
        }
        tmp = name + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        # A rename, so the test never reads a half-written message.
        os.rename(tmp, name)
        return "250 OK"


async def serve(outdir, kwargs):
    loop = asyncio.get_running_loop()
    # One handler for every connection: it numbers the messages.
    sink = Sink(outdir)
    server = await loop.create_server(
        lambda: SMTP(sink, **kwargs), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    print("ready %d" % port, flush=True)
    try:
        await loop.run_in_executor(None, sys.stdin.read)
    finally:
        server.close()


def main():
    outdir = sys.argv[1]
    kwargs = {}
    if len(sys.argv) > 2 and sys.argv[2] == "--starttls":
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(sys.argv[3], sys.argv[4])
        kwargs = {"tls_context": ctx, "require_starttls": True}
    asyncio.run(serve(outdir, kwargs))


if __name__ == "__main__":
    main()
