"""A loopback SMTP server for patchbook's notification tests.

Usage: smtp_sink.py PORT OUTDIR [--starttls CERT KEY]

Saves every accepted message as OUTDIR/NNNN.json with its envelope sender and
recipients, its raw content and its decoded subject, From, To and body, then prints "ready" once it listens. It stops when its
stdin closes, so it cannot outlive the test that started it.
"""

import email
import email.policy
import json
import os
import sys

from aiosmtpd.controller import Controller


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


def main():
    port = int(sys.argv[1])
    outdir = sys.argv[2]
    kwargs = {}
    if len(sys.argv) > 3 and sys.argv[3] == "--starttls":
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(sys.argv[4], sys.argv[5])
        kwargs = {"tls_context": ctx, "require_starttls": True}
    controller = Controller(Sink(outdir), hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
