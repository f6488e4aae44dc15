from setuptools import find_packages, setup

setup(
    name="mailgate",
    version="0.1.0",
    description="Transparent IMAP/SMTP gateway for export-trade sales teams",
    python_requires=">=3.11",
    packages=find_packages(include=["gateway", "gateway.*", "panel", "panel.*"]),
    include_package_data=True,
    package_data={"panel": ["templates/*.html", "templates/*/*.html", "static/*"]},
    install_requires=[
        "aiosmtpd>=1.4.6",
        "twisted[tls]>=24.7",
        "imapclient>=3.0",
        "peewee>=4.5,<5",  # gateway.db.ReconnectingPostgres relies on 4.x's transaction stack (tested)
        "bottle>=0.13",
        "dkimpy>=1.1.5",
        "python-magic>=0.4.27",
        "cryptography>=42",
        "PyYAML>=6.0",
        "prometheus-client>=0.20",
        "argon2-cffi>=23.1",
        "openpyxl>=3.1",
        "regex>=2023.0",
        "nh3>=0.2.17",
        "Jinja2>=3.1",
        "zstandard>=0.22",
        "uvloop>=0.19",
    ],
    extras_require={
        "postgres": ["psycopg2-binary>=2.9"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "pynacl>=1.5",
            "psycopg2-binary>=2.9",
            "playwright>=1.45",
            "ruff>=0.5",
        ],
    },
    entry_points={"console_scripts": ["mailgate = gateway.cli:main"]},
)
