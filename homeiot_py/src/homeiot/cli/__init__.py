"""The console scripts' argument parsing and exit codes (``homeiot-gateway``,
``homeiot-publisher``); the services they run live in :mod:`homeiot.services`."""
