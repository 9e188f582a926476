# Standard nbdev 2 setup.py: everything is read from settings.ini.
from configparser import ConfigParser
import setuptools, shlex

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

expected = 'version description keywords author author_email'.split()
missing = [o for o in expected if o not in cfg]
if missing: raise KeyError(f'settings.ini is missing: {missing}')

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['Planning', 'Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive']
lic = licenses[cfg['license'].lower()]
requirements = shlex.split(cfg.get('requirements', ''))
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))
# Extras: one per paper ([wsi], [seg], [meta], [vlm]), [notebooks], [docs]; [all] is all of them, [dev] adds the test tools.
extras = {key[len('extra_'):-len('_requirements')]: shlex.split(cfg[key])
          for key in cfg if key.startswith('extra_') and key.endswith('_requirements')}
extras['all'] = sorted({r for reqs in extras.values() for r in reqs})
extras['dev'] = extras['all'] + dev_requirements

setuptools.setup(
    name=cfg['lib_name'], license=lic[0], version=cfg['version'],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])], 'Intended Audience :: ' + cfg['audience'].title(),
                 'License :: ' + lic[1], 'Natural Language :: ' + cfg['language'].title(), 'Programming Language :: Python :: 3'],
    url=cfg['git_url'],
    # the repository's data/ (embedded demo data) ships inside the package as medssm/_data, so a wheel runs `medssm demo`
    packages=setuptools.find_packages(include=['medssm', 'medssm.*']) + ['medssm._data'],
    package_dir={'medssm._data': 'data'}, package_data={'medssm._data': ['*/*']}, include_package_data=True,
    install_requires=requirements, extras_require=extras, python_requires='>=' + cfg['min_python'],
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    zip_safe=False, entry_points={'console_scripts': shlex.split(cfg.get('console_scripts', '')),
                                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    author=cfg['author'], author_email=cfg['author_email'], description=cfg['description'], keywords=cfg['keywords'])
