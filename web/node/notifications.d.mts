// TypeScript looks for `.d.mts` types next to an `.mjs` file; the types are in notifications.d.ts.
export * from './notifications.js';
export { default } from './notifications.js';
