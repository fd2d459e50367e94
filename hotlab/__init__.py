"""hotlab: control and monitoring of radiopharmacy hot-lab instruments.

The installed packages are `hotlab.physics` (units, nuclides, decay, UTC time), `hotlab.drivers`,
`hotlab.simulators` and `hotlab.controller`; each lives in the repository folder of the same name.
"""
