"""Offline stand-in for ansible-test's get-pip bootstrap (ci-files.testing.ansible.com is unreachable here).

ansible-test runs pip with PIP_CONFIG_FILE=/dev/null, so the machine's CA bundle (a TLS-inspecting proxy)
is lost: bootstrap pip with ensurepip, then make every later pip run in this venv use the system CA bundle
through a .pth start-up hook, then install the pip version ansible-test asked for."""
import ensurepip
import os
import subprocess
import sys
import sysconfig

CA = "/etc/ssl/certs/ca-certificates.crt"
ensurepip.bootstrap(upgrade=True)
if os.path.isfile(CA):
    site = sysconfig.get_paths()["purelib"]
    with open(os.path.join(site, "zz_modulus_pip_cert.pth"), "w") as handle:
        handle.write("import os; os.environ.setdefault('PIP_CERT', %r)\n" % CA)
    os.environ.setdefault("PIP_CERT", CA)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install"] + args))
