#!/usr/bin/env node
import { main } from '../dist/src/cli/torusctl.js';

main(process.argv.slice(2));
