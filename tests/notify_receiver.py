"""A stand-in webhook receiver for the notice tests: each POST it gets is one JSON line (path, Content-Type,
body). Imported by the local tests (Receiver: a thread on 127.0.0.1) and run as a script on a lab host:
`python3 notify_receiver.py PORT FILE` (standard library only: the lab hosts have Debian's python3).
"""

import http.server
import json
import sys
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        self.server.record({"path": self.path, "content_type": self.headers.get("Content-Type"), "body": body})
        status = self.server.status
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, path=None):
        super().__init__(address, _Handler)
        self.lock = threading.Lock()
        self.path = path
        self.posts = []
        self.status = 200

    def record(self, post):
        with self.lock:
            self.posts.append(post)
            if self.path:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(post) + "\n")


class Receiver:
    """A receiver in a thread of this process; `posts` are the POSTs so far, `status` what it answers."""

    def __init__(self):
        self.server = _Server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def posts(self):
        with self.server.lock:
            return list(self.server.posts)

    def answer(self, status):
        self.server.status = status

    def close(self):
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    _Server(("0.0.0.0", int(sys.argv[1])), sys.argv[2]).serve_forever()
