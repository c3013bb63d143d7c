"""Runs moto's S3 server on 0.0.0.0:5000 and creates the buckets MOTO_BUCKETS names
(comma-separated, default "brats"), so that the compose `s3` profile's services find their
bucket without a separate set-up step. The bucket exists before the health check passes."""
import os
import threading
import urllib.request

from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="0.0.0.0", port=5000, verbose=False)
server.start()
for bucket in filter(None, os.environ.get("MOTO_BUCKETS", "brats").split(",")):
    request = urllib.request.Request(f"http://127.0.0.1:5000/{bucket.strip()}", method="PUT")
    urllib.request.urlopen(request).read()
    print(f"moto: bucket {bucket.strip()} ready", flush=True)
threading.Event().wait()
